//! The rules that span objects: what a VirtualService's destinations name is looked up across the
//! set (a subset not defined by any DestinationRule for its host, a host that is no service: a
//! warning, since the missing object may arrive later), and the Istio objects of a set become the
//! [`MeshConfig`] the engine compiles.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use super::{
    diagnostic::{Diagnostic, Severity},
    gateway_api::{merge, GATEWAY, GRPC_ROUTE, HTTP_ROUTE},
    model::{Host, MeshConfig},
    object::{Object, ObjectKey, ObjectSet, Sourced},
};

/// The rules of `objects`, in key order: Istio's, and HTTPRoutes merged into VirtualServices
/// (see `config::gateway_api`).
pub fn mesh_config(objects: &ObjectSet) -> MeshConfig {
    let mut config = MeshConfig::default();
    for sourced in istio_objects(objects) {
        match &sourced.object {
            Object::DestinationRule(o) => config.destination_rules.push(Arc::clone(&o.rule)),
            Object::Gateway(o) => config.gateways.push(Arc::clone(&o.rule)),
            Object::AuthorizationPolicy(o) => {
                config.authorization_policies.push(Arc::clone(&o.rule))
            }
            Object::PeerAuthentication(o) => config.peer_authentications.push(Arc::clone(&o.rule)),
            _ => {}
        }
    }
    let virtual_services: Vec<&Sourced> =
        of_kind(objects, "VirtualService").map(|o| &**o).collect();
    let http_routes: Vec<&Sourced> = of_kind(objects, HTTP_ROUTE)
        .chain(of_kind(objects, GRPC_ROUTE))
        .map(|o| &**o)
        .collect();
    config.virtual_services = merge::claims(&virtual_services, &http_routes).virtual_services;
    config
}

/// Whether a change to an object of this kind can change the [`MeshConfig`].
pub fn is_rule_kind(kind: &str) -> bool {
    matches!(
        kind,
        "VirtualService"
            | "DestinationRule"
            | "Gateway"
            | "AuthorizationPolicy"
            | "PeerAuthentication"
            | HTTP_ROUTE
            | GRPC_ROUTE
            | GATEWAY
    )
}

/// The Istio objects of the set but VirtualServices (merged with HTTPRoutes), without walking
/// the others (keys sort by kind first).
fn istio_objects(objects: &ObjectSet) -> impl Iterator<Item = &Arc<Sourced>> {
    [
        "AuthorizationPolicy",
        "DestinationRule",
        "Gateway",
        "PeerAuthentication",
        GATEWAY,
    ]
    .into_iter()
    .flat_map(|kind| of_kind(objects, kind))
}

/// The objects of one kind.
pub fn of_kind<'a>(objects: &'a ObjectSet, kind: &str) -> impl Iterator<Item = &'a Arc<Sourced>> {
    let first = ObjectKey {
        kind: kind.into(),
        namespace: "".into(),
        name: "".into(),
    };
    let kind: Arc<str> = first.kind.clone();
    objects
        .range(first..)
        .take_while(move |(key, _)| key.kind == kind)
        .map(|(_, sourced)| sourced)
}

/// What the destinations of the set's VirtualServices name that does not exist (yet): a subset
/// that no DestinationRule for its host defines and, when `services` is given (the fully
/// qualified names of the services known), a host that is no known service. Neither is an
/// error: watch events and `kubectl apply -f dir/` come in any order, and Istio accepts both.
/// As `istioctl analyze` does (IST0101), each is a warning, naming its VirtualService and
/// field; requests routed there are answered 503 `NR` until it exists.
///
/// Subsets are looked for across the whole set (VirtualServices and DestinationRules may live
/// in different files), merged per host as Istio merges several rules for one host. Subsets of
/// hosts in `unknown_rule_hosts` (rules that failed to load: their subsets are unknown, not
/// missing) are not reported.
pub fn check_references(
    objects: &[&Sourced],
    unknown_rule_hosts: &[Host],
    services: Option<&BTreeSet<String>>,
) -> Vec<Diagnostic> {
    let mut subsets_by_host: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for sourced in objects {
        if let Object::DestinationRule(rule) = &sourced.object {
            subsets_by_host
                .entry(rule.rule.host.reference_key())
                .or_default()
                .extend(rule.rule.subsets.iter().map(|s| s.name.as_str()));
        }
    }
    let unknown: BTreeSet<String> = unknown_rule_hosts.iter().map(Host::reference_key).collect();
    let mut warnings = Vec::new();
    for sourced in objects {
        let destinations = match &sourced.object {
            Object::VirtualService(o) => &o.destinations,
            Object::HttpRoute(o) | Object::GrpcRoute(o) => &o.destinations,
            _ => continue,
        };
        let mut warn = |field: String, reason: String| {
            warnings.push(Diagnostic {
                severity: Severity::Warning,
                file: sourced.origin.to_string(),
                object: sourced.key.to_string(),
                field,
                reason,
            })
        };
        for reference in destinations.iter() {
            let key = reference.host.reference_key();
            let host = &reference.host.name;
            let known_service = key.starts_with('*') || services.is_none_or(|s| s.contains(&key));
            if !known_service {
                warn(
                    format!("{}.host", reference.field),
                    format!(
                        "host {host} is no known service (yet): requests routed to it are \
                         answered 503 NR until a Service of that name exists"
                    ),
                );
            }
            let Some(subset) = &reference.subset else {
                continue;
            };
            if unknown.contains(&key) {
                continue;
            }
            let defined = subsets_by_host.get(&key).or_else(|| {
                subsets_by_host
                    .iter()
                    .find(|(host, _)| wildcard_covers(host, &key))
                    .map(|(_, subsets)| subsets)
            });
            let found = match defined {
                Some(subsets) if subsets.contains(&subset.as_str()) => continue,
                Some(subsets) if subsets.is_empty() => {
                    format!("the DestinationRule for host {host} defines no subsets")
                }
                Some(subsets) => format!(
                    "the DestinationRule for host {host} defines {}",
                    subsets.join(", ")
                ),
                None => format!("no DestinationRule for host {host}"),
            };
            warn(
                format!("{}.subset", reference.field),
                format!(
                    "subset {subset:?} is not defined (yet): {found}; requests routed to it are \
                     answered 503 NR until a DestinationRule defines it"
                ),
            );
        }
    }
    let of = |kind: &str| -> Vec<&Sourced> {
        objects
            .iter()
            .copied()
            .filter(|o| &*o.key.kind == kind)
            .collect()
    };
    let routes = [of(HTTP_ROUTE), of(GRPC_ROUTE)].concat();
    let claims = merge::claims(&of("VirtualService"), &routes);
    warnings.extend(claims.warnings);
    warnings
}

fn wildcard_covers(pattern: &str, host: &str) -> bool {
    pattern == "*"
        || pattern
            .strip_prefix('*')
            .is_some_and(|suffix| host.ends_with(suffix))
}
