//! Compiling the config and registry into one immutable snapshot the hot path only reads.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::clock::Epoch;
use super::cluster::{service_label, Cluster, ClusterKey, ClusterSet, Target};
use super::fault::FaultRule;
use super::gateway::{BoundRules, Gateways};
use super::metrics::EngineMetrics;
use super::mirror::MirrorRule;
use super::redirect::LocalRule;
use super::registry::{resolve_host_owned, Registry, Service};
use super::retry::{self, ResolvedRetry};
use super::routing::{Match, RouteTable};
use super::settings::EngineSettings;
use super::split::{Split, MAX_DESTINATIONS};
use crate::config::model::{
    Exclusive, Headers, Host, HttpRoute, MeshConfig, Rewrite, VirtualService,
};

/// Everything a decision reads. Mutable state lives behind atomics inside (`Cluster::shared`,
/// endpoint states, split and spread counters), so a snapshot is shared by `Arc` and never
/// locked.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) settings: EngineSettings,
    pub(crate) epoch: Epoch,
    pub(crate) metrics: Arc<EngineMetrics>,
    pub(crate) seeds: Arc<AtomicU64>,
    /// What this snapshot was compiled from, so the next one can tell what changed.
    config: MeshConfig,
    registry: Registry,
    // Routes and what selects them depend on the rules and on which services exist with which
    // ports, not on endpoints: a change of endpoints alone shares them with the next snapshot.
    pub(crate) table: Arc<RouteTable>,
    pub(crate) routes: Arc<[Route]>,
    pub(crate) gateways: Arc<Gateways>,
    pub(crate) clusters: Vec<Arc<Cluster>>,
    pub(crate) cluster_keys: Arc<[ClusterKey]>,
}

/// A compiled `http[]` entry (or a service's default route).
#[derive(Debug)]
pub(crate) struct Route {
    /// `namespace/virtual-service/route-name-or-index`, or `default` for a service's own.
    pub(crate) name: Box<str>,
    pub(crate) matches: Box<[Match]>,
    pub(crate) gateways: Box<[Box<str>]>,
    pub(crate) destinations: Box<[RouteDestination]>,
    pub(crate) split: Split,
    pub(crate) rewrite: Option<Rewrite>,
    pub(crate) headers: Headers,
    pub(crate) timeout: Option<std::time::Duration>,
    pub(crate) retry: ResolvedRetry,
    pub(crate) fault: Option<FaultRule>,
    pub(crate) mirror: Option<MirrorRule>,
    /// The route answers by itself (a redirect, a direct response): it has no destinations.
    pub(crate) local: Option<LocalRule>,
}

#[derive(Debug)]
pub(crate) struct RouteDestination {
    pub(crate) target: Target,
    pub(crate) headers: Headers,
}

/// State and identity carried from one snapshot to the next.
pub(crate) struct Lineage<'a> {
    pub(crate) settings: EngineSettings,
    pub(crate) epoch: Epoch,
    pub(crate) metrics: Arc<EngineMetrics>,
    pub(crate) seeds: Arc<AtomicU64>,
    /// The snapshot being replaced: its clusters' live state carries over.
    pub(crate) previous: Option<&'a Snapshot>,
}

impl Snapshot {
    /// Compiles `config` and `registry`. Against a previous snapshot, only what changed is
    /// built again: when the rules and the services (names and ports) are the same, only the
    /// clusters of services whose endpoints changed; otherwise routes are compiled anew and
    /// each cluster whose service and rules are the very same objects is reused.
    pub(crate) fn compile(
        config: &MeshConfig,
        registry: &Registry,
        lineage: Lineage<'_>,
        now: u64,
    ) -> Snapshot {
        if let Some(previous) = lineage.previous {
            if same_rules(&previous.config, config) && same_services(&previous.registry, registry) {
                return previous.with_endpoints(registry, lineage, now);
            }
        }
        let (keys, clusters): (&[ClusterKey], &[Arc<Cluster>]) = match lineage.previous {
            Some(previous) => (&previous.cluster_keys, &previous.clusters),
            None => (&[], &[]),
        };
        let metrics = Arc::clone(&lineage.metrics);
        let mut clusters = ClusterSet::new(config, registry, (keys, clusters), &metrics, now);
        let mut table = RouteTable::default();
        let mut routes = Vec::new();

        let mut bound = Vec::new();
        for vs in &config.virtual_services {
            let gateways = normalize_gateways(&vs.gateways, &vs.id.namespace);
            let first = routes.len() as u32;
            for (index, http) in vs.http.iter().enumerate() {
                routes.push(compile_route(vs, index, http, &gateways, &mut clusters));
            }
            let ids = first..routes.len() as u32;
            let hosts: Vec<String> = vs.hosts.iter().map(|h| rule_host(h, &clusters)).collect();
            // Only a rule that serves mesh traffic can take its hosts' default route away: an
            // HTTPRoute bound to a Gateway alone leaves the service as it was inside the mesh.
            let mesh = gateways.iter().any(|g| &**g == "mesh");
            for fqdn in &hosts {
                let vhost = table.vhost_mut(fqdn);
                vhost.routes.extend(ids.clone());
                if mesh {
                    vhost.exclusive.union(&vs.exclusive);
                    table.any_exclusive |= vs.exclusive != Exclusive::No;
                }
            }
            let mut named: Vec<Box<str>> = routes[first as usize..]
                .iter()
                .flat_map(|r| r.matches.iter().flat_map(|m| m.gateways.iter().flatten()))
                .chain(gateways.iter())
                .filter(|g| &***g != "mesh")
                .cloned()
                .collect();
            if !named.is_empty() {
                named.sort_unstable();
                named.dedup();
                bound.push(BoundRules {
                    namespace: &vs.id.namespace,
                    gateways: named,
                    hosts,
                    routes: ids,
                });
            }
        }
        for service in &registry.services {
            let fqdn = service.fqdn();
            let target = clusters.target(fqdn, None, None);
            let id = routes.len() as u32;
            routes.push(default_route(target));
            table.vhost_mut(fqdn).default = Some(id);
        }

        let destinations: HashSet<&str> = clusters
            .clusters
            .iter()
            .map(|c| service_label(&c.inputs))
            .collect();
        metrics.keep_services(&destinations);
        let gateways = Gateways::compile(
            &config.gateways,
            lineage.settings.gateway_labels.as_ref(),
            &bound,
        );
        Snapshot {
            settings: lineage.settings,
            epoch: lineage.epoch,
            metrics: lineage.metrics,
            seeds: lineage.seeds,
            config: config.clone(),
            registry: registry.clone(),
            table: Arc::new(table),
            routes: routes.into(),
            gateways: Arc::new(gateways),
            clusters: clusters.clusters,
            cluster_keys: clusters.keys.into(),
        }
    }

    /// This snapshot with `registry`'s endpoints, when only endpoints changed: the clusters of
    /// each service that is not the very same object are rebuilt, everything else is shared.
    fn with_endpoints(&self, registry: &Registry, lineage: Lineage<'_>, now: u64) -> Snapshot {
        let changed: HashMap<*const Service, &Arc<Service>> = self
            .registry
            .services
            .iter()
            .zip(&registry.services)
            .filter(|(old, new)| !Arc::ptr_eq(old, new))
            .map(|(old, new)| (Arc::as_ptr(old), new))
            .collect();
        let clusters = self
            .clusters
            .iter()
            .zip(self.cluster_keys.iter())
            .map(|(cluster, key)| {
                let service = cluster.inputs.service.as_ref();
                match service.and_then(|s| changed.get(&Arc::as_ptr(s))) {
                    Some(service) => Arc::new(cluster.with_service(key, service, now)),
                    None => Arc::clone(cluster),
                }
            })
            .collect();
        Snapshot {
            settings: lineage.settings,
            epoch: lineage.epoch,
            metrics: lineage.metrics,
            seeds: lineage.seeds,
            config: self.config.clone(),
            registry: registry.clone(),
            table: Arc::clone(&self.table),
            routes: Arc::clone(&self.routes),
            gateways: Arc::clone(&self.gateways),
            clusters,
            cluster_keys: Arc::clone(&self.cluster_keys),
        }
    }

    /// The live state to hand to the next snapshot.
    pub(crate) fn lineage(&self, settings: EngineSettings) -> Lineage<'_> {
        Lineage {
            settings,
            epoch: self.epoch,
            metrics: Arc::clone(&self.metrics),
            seeds: Arc::clone(&self.seeds),
            previous: Some(self),
        }
    }
}

/// The same rules: every VirtualService, DestinationRule and Gateway is the very same object.
fn same_rules(a: &MeshConfig, b: &MeshConfig) -> bool {
    fn same<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
    }
    same(&a.virtual_services, &b.virtual_services)
        && same(&a.destination_rules, &b.destination_rules)
        && same(&a.gateways, &b.gateways)
}

/// The same services, in the same order, with the same ports: routes and cluster keys depend
/// on nothing else of the registry.
fn same_services(a: &Registry, b: &Registry) -> bool {
    a.services.len() == b.services.len()
        && a.services
            .iter()
            .zip(&b.services)
            .all(|(a, b)| a.fqdn() == b.fqdn() && a.ports == b.ports)
}

/// A rule's host as a lookup key: the resolved service name, except that a one-dot name that is
/// not a known service (`example.com`) stays as written.
fn rule_host(host: &Host, clusters: &ClusterSet<'_>) -> String {
    let fqdn = resolve_host_owned(&host.name, &host.namespace);
    let one_dot = host.name.trim_end_matches('.').matches('.').count() == 1;
    if one_dot && clusters.service(&fqdn).is_none() {
        host.name.trim_end_matches('.').to_ascii_lowercase()
    } else {
        fqdn
    }
}

/// `gateways` as `mesh` or `namespace/name` (short names are in the rule's namespace);
/// none means `mesh`.
fn normalize_gateways(gateways: &[String], namespace: &str) -> Box<[Box<str>]> {
    if gateways.is_empty() {
        return Box::new(["mesh".into()]);
    }
    gateways
        .iter()
        .map(|g| {
            if g == "mesh" || g.contains('/') {
                g.as_str().into()
            } else {
                format!("{namespace}/{g}").into()
            }
        })
        .collect()
}

fn compile_route(
    vs: &VirtualService,
    index: usize,
    http: &HttpRoute,
    gateways: &[Box<str>],
    clusters: &mut ClusterSet<'_>,
) -> Route {
    let name = format!(
        "{}/{}/{}",
        vs.id.namespace,
        vs.id.name,
        http.name.clone().unwrap_or_else(|| index.to_string())
    );
    let matches = http
        .matches
        .iter()
        .map(|m| Match {
            spec: m.clone(),
            gateways: (!m.gateways.is_empty())
                .then(|| normalize_gateways(&m.gateways, &vs.id.namespace)),
        })
        .collect();
    let mut target = |d: &crate::config::model::Destination| {
        let fqdn = rule_host(&d.host, clusters);
        clusters.target(&fqdn, d.port, d.subset.as_deref())
    };
    let route_destinations = &http.route[..http.route.len().min(MAX_DESTINATIONS)];
    let destinations: Box<[RouteDestination]> = route_destinations
        .iter()
        .map(|d| RouteDestination {
            target: target(&d.destination),
            headers: d.headers.clone(),
        })
        .collect();
    let weights: Vec<u32> = route_destinations.iter().map(|d| d.weight).collect();
    let mirror = http
        .mirror
        .as_ref()
        .map(|m| MirrorRule::new(target(&m.destination), m.percentage));
    Route {
        name: name.into(),
        matches,
        gateways: gateways.into(),
        destinations,
        split: Split::new(&weights),
        rewrite: http.rewrite.clone(),
        headers: http.headers.clone(),
        timeout: http.timeout.filter(|t| !t.is_zero()),
        retry: retry::resolve(http.retries.as_ref()),
        fault: http.fault.as_ref().map(FaultRule::new),
        mirror,
        local: match (&http.redirect, http.direct_response) {
            (Some(redirect), _) => Some(LocalRule::Redirect(redirect.clone())),
            (None, Some(status)) => Some(LocalRule::Direct(status)),
            (None, None) => None,
        },
    }
}

/// A service's own route: all its endpoints, Istio's default retries, no timeout.
fn default_route(target: Target) -> Route {
    Route {
        name: "default".into(),
        matches: Box::new([]),
        gateways: Box::new([]),
        destinations: Box::new([RouteDestination {
            target,
            headers: Headers::default(),
        }]),
        split: Split::new(&[100]),
        rewrite: None,
        headers: Headers::default(),
        timeout: None,
        retry: retry::resolve(None),
        fault: None,
        mirror: None,
        local: None,
    }
}
