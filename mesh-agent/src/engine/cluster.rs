//! Destination clusters: the endpoints of one (service, port, subset) with their traffic policy
//! and live state, as Envoy's `outbound|port|subset|host` clusters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::balance::{self, Cursor, Tried};
use super::endpoint::{authority_of, ClusterEndpoint, EndpointState};
use super::error::EngineError;
use super::metrics::{EngineMetrics, ServiceEvents};
use super::outlier::{self, ClusterHealth, Observation, OutlierPolicy};
use super::pool::{PoolCounters, PoolLimits};
use super::registry::{resolve_host_owned, Registry, Service};
use super::retry::BudgetState;
use crate::config::model::{DestinationRule, LoadBalancer, MeshConfig, TrafficPolicy};
use crate::identity::{ServiceIdentity, UNKNOWN};

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
    /// Whether what the cluster stands for exists: its host is a service and its subset (if
    /// any) is defined. A request routed to one that does not is answered 503 `NR`.
    pub(crate) exists: bool,
    pub(crate) endpoints: Box<[ClusterEndpoint]>,
    pub(crate) lb: LoadBalancer,
    pub(crate) limits: PoolLimits,
    outlier: Option<OutlierPolicy>,
    pub(crate) shared: Arc<ClusterShared>,
    /// The destination service's retry budget (shared by all its clusters).
    pub(crate) budget: Arc<BudgetState>,
    /// The destination service's counters (shared by all its clusters).
    pub(crate) events: Arc<ServiceEvents>,
    pub(crate) inputs: Inputs,
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
            EngineMetrics::inc(&self.events.panic_routing);
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
        let health = &endpoint.state.health;
        let was_ejected = health.is_ejected();
        outlier::record(
            policy,
            &self.shared.health,
            health,
            total,
            observation,
            now,
            metrics,
        );
        if !was_ejected && health.is_ejected() {
            EngineMetrics::inc(&self.events.ejections);
        }
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

/// What a cluster was built from. A new snapshot reuses a cluster whose inputs are the very same
/// objects (compared by address), so a change rebuilds only the clusters it touches.
#[derive(Debug)]
pub(crate) struct Inputs {
    /// The destination service, when the host is one.
    pub(crate) service: Option<Arc<Service>>,
    /// Every DestinationRule for the host, oldest first.
    pub(crate) rules: Vec<Arc<DestinationRule>>,
}

impl Inputs {
    fn same_as(&self, other: &Inputs) -> bool {
        let service = match (&self.service, &other.service) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        service
            && self.rules.len() == other.rules.len()
            && self
                .rules
                .iter()
                .zip(&other.rules)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

impl Cluster {
    /// Builds the cluster `key` from its inputs. Live state comes from `previous`, the cluster
    /// of the same key in the snapshot this one replaces: its pool counters, balancer cursor and
    /// sweep schedule, and the state of each endpoint that is still there. `now` is the current
    /// tick: a new cluster's first outlier sweep is one interval later.
    pub(crate) fn build(
        key: &ClusterKey,
        inputs: Inputs,
        previous: Option<&Cluster>,
        (budget, events): (Arc<BudgetState>, Arc<ServiceEvents>),
        now: u64,
    ) -> Cluster {
        // Several rules for one host merge as in Istio: the oldest rule's traffic policy,
        // subsets from all of them (the first definition of a name wins).
        let subset = key.subset.as_deref().and_then(|name| {
            inputs
                .rules
                .iter()
                .find_map(|r| r.subsets.iter().find(|s| s.name == name))
        });
        let policy = effective_policy(
            inputs.rules.first().map(|r| &r.traffic_policy),
            subset.map(|s| &s.traffic_policy),
        );
        let carried: HashMap<SocketAddr, &Arc<EndpointState>> = previous
            .into_iter()
            .flat_map(|p| p.endpoints.iter().map(|e| (e.addr, &e.state)))
            .collect();

        let mut endpoints = Vec::new();
        let subset_missing = key.subset.is_some() && subset.is_none();
        if let (Some(service), false) = (&inputs.service, subset_missing) {
            if let Some(port) = service.port_for(key.port) {
                for endpoint in &service.endpoints {
                    let selected = subset.is_none_or(|s| {
                        s.labels
                            .iter()
                            .all(|(k, v)| endpoint.labels.get(k) == Some(v))
                    });
                    if selected {
                        let addr = SocketAddr::new(endpoint.ip, port.target_port);
                        endpoints.push(ClusterEndpoint {
                            addr,
                            authority: authority_of(addr),
                            workload: endpoint.workload.clone(),
                            state: carried
                                .get(&addr)
                                .map_or_else(Arc::default, |s| Arc::clone(s)),
                        });
                    }
                }
            }
        }

        let outlier = policy.outlier_detection.as_ref().map(OutlierPolicy::new);
        let first_sweep = now + outlier.as_ref().map_or(0, OutlierPolicy::interval);
        let shared = previous.map_or_else(
            || {
                Arc::new(ClusterShared {
                    pool: Arc::default(),
                    cursor: Cursor::default(),
                    health: ClusterHealth::new(first_sweep),
                })
            },
            |p| Arc::clone(&p.shared),
        );
        shared
            .health
            .recount(endpoints.iter().map(|e| &e.state.health));
        let destination = Destination {
            service: inputs.service.as_ref().map(|s| Arc::clone(&s.identity)),
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
            exists: inputs.service.is_some() && !subset_missing,
            endpoints: endpoints.into_boxed_slice(),
            lb: policy.load_balancer.unwrap_or_default(),
            limits: PoolLimits::new(policy.connection_pool.as_ref()),
            outlier,
            shared,
            budget,
            events,
            inputs,
        }
    }

    /// This cluster with `service` in place of its service (same rules, same key).
    pub(crate) fn with_service(
        &self,
        key: &ClusterKey,
        service: &Arc<Service>,
        now: u64,
    ) -> Cluster {
        let inputs = Inputs {
            service: Some(Arc::clone(service)),
            rules: self.inputs.rules.clone(),
        };
        let per_service = (Arc::clone(&self.budget), Arc::clone(&self.events));
        Cluster::build(key, inputs, Some(self), per_service, now)
    }
}

/// Builds clusters on demand while routes are compiled, one per distinct key, reusing the
/// previous snapshot's cluster where its inputs did not change.
pub(crate) struct ClusterSet<'a> {
    registry: &'a Registry,
    metrics: &'a EngineMetrics,
    services: HashMap<&'a str, usize>,
    /// Every DestinationRule per host, oldest first.
    rules: HashMap<String, Vec<Arc<DestinationRule>>>,
    /// The previous snapshot's clusters, by key.
    previous: HashMap<&'a ClusterKey, &'a Arc<Cluster>>,
    /// Retry budgets per destination host: the previous snapshot's, and those of hosts new in
    /// this one.
    previous_budgets: HashMap<&'a str, &'a Arc<BudgetState>>,
    new_budgets: HashMap<Box<str>, Arc<BudgetState>>,
    now: u64,
    index: HashMap<ClusterKey, u32>,
    pub(crate) keys: Vec<ClusterKey>,
    pub(crate) clusters: Vec<Arc<Cluster>>,
}

impl<'a> ClusterSet<'a> {
    /// `previous` are the keys and clusters of the snapshot being replaced.
    pub(crate) fn new(
        config: &MeshConfig,
        registry: &'a Registry,
        previous: (&'a [ClusterKey], &'a [Arc<Cluster>]),
        metrics: &'a EngineMetrics,
        now: u64,
    ) -> Self {
        let services = registry
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.fqdn(), i))
            .collect();
        let mut rules: HashMap<String, Vec<Arc<DestinationRule>>> = HashMap::new();
        for rule in &config.destination_rules {
            let host = resolve_host_owned(&rule.host.name, &rule.host.namespace);
            rules.entry(host).or_default().push(Arc::clone(rule));
        }
        let (keys, clusters) = previous;
        let previous_budgets = keys
            .iter()
            .zip(clusters)
            .map(|(key, cluster)| (&*key.host, &cluster.budget))
            .collect();
        ClusterSet {
            registry,
            metrics,
            services,
            rules,
            previous: keys.iter().zip(clusters).collect(),
            previous_budgets,
            new_budgets: HashMap::new(),
            now,
            index: HashMap::new(),
            keys: Vec::new(),
            clusters: Vec::new(),
        }
    }

    pub(crate) fn service(&self, fqdn: &str) -> Option<&'a Arc<Service>> {
        let registry = self.registry;
        self.services.get(fqdn).map(|&i| &registry.services[i])
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
        let inputs = Inputs {
            service: self.service(fqdn).cloned(),
            rules: self.rules.get(fqdn).cloned().unwrap_or_default(),
        };
        let previous = self.previous.get(&key).copied();
        let cluster = match previous {
            Some(previous) if previous.inputs.same_as(&inputs) => Arc::clone(previous),
            _ => {
                let budget = match self.previous_budgets.get(fqdn) {
                    Some(budget) => Arc::clone(budget),
                    None => Arc::clone(
                        self.new_budgets
                            .entry(fqdn.into())
                            .or_insert_with(|| Arc::new(BudgetState::new())),
                    ),
                };
                let events = self.metrics.service_events(service_label(&inputs));
                Arc::new(Cluster::build(
                    &key,
                    inputs,
                    previous.map(|p| &**p),
                    (budget, events),
                    self.now,
                ))
            }
        };
        let index = u32::try_from(self.clusters.len()).expect("fewer than 2^32 clusters");
        self.clusters.push(cluster);
        self.keys.push(key.clone());
        self.index.insert(key, index);
        index
    }
}

/// How the per-service counters name a cluster's destination: its service's host, or `unknown`
/// for a host that is not a service of the registry.
pub(crate) fn service_label(inputs: &Inputs) -> &str {
    inputs
        .service
        .as_ref()
        .map_or(UNKNOWN, |s| s.identity.host.as_str())
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
