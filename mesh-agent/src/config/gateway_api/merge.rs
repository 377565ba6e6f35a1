//! Every route attached to one Service merged into one exclusive VirtualService, the hosts a
//! VirtualService and routes (or an HTTPRoute and a GRPCRoute) both claim settled, and the
//! routes attached to Gateways bound to them; see [`super`] for the rules.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;

use crate::config::diagnostic::{Diagnostic, Severity};
use crate::config::model::{
    Exclusive, Headers, Host, HttpRoute, ObjectRef, Precedence, RequestMatch, RouteKind,
    VirtualService,
};
use crate::config::object::{Object, Sourced};

/// The VirtualServices in force once HTTPRoutes are merged in, and a warning for each object
/// whose rules for a host are not used because another claims it.
pub(crate) struct Claims {
    pub virtual_services: Vec<Arc<VirtualService>>,
    pub warnings: Vec<Diagnostic>,
}

/// Every route attached to one Service, on the way to its VirtualService.
struct Merged<'a> {
    host: Host,
    /// The oldest route's: the age of the whole set when a VirtualService claims the host too.
    created: Option<Timestamp>,
    /// The ports its routes are attached to.
    exclusive: Exclusive,
    routes: Vec<(Order<'a>, HttpRoute)>,
    /// Consumer routes' namespaces, with the ports of their parents.
    consumers: BTreeMap<String, Vec<Option<u16>>>,
    objects: Vec<&'a Sourced>,
}

/// Where a route goes among all those of a Service, smallest first: consumer routes (of a
/// namespace other than the Service's, for its clients alone) before producer routes, each
/// most specific first.
type Order<'a> = (
    Producer<'a>,
    Reverse<Precedence>,
    Age,
    &'a str,
    &'a str,
    usize,
);

/// `(false, namespace)` for a consumer route, `(true, "")` for a producer route: consumers
/// first, by namespace.
type Producer<'a> = (bool, &'a str);

const PRODUCER: Producer<'static> = (true, "");

/// Older first; an object without a creation time counts as the newest.
type Age = (bool, Option<Timestamp>);

fn age(created: Option<Timestamp>) -> Age {
    (created.is_none(), created)
}

/// Merges the HTTPRoutes and GRPCRoutes of `routes` per Service and kind, and settles the
/// Services both kinds, or a kind and `virtual_services`, claim (all as read, any order).
pub(crate) fn claims(virtual_services: &[&Sourced], routes: &[&Sourced]) -> Claims {
    let mut by_kind: BTreeMap<(String, RouteKind), Merged> = BTreeMap::new();
    for sourced in routes {
        let (Object::HttpRoute(object) | Object::GrpcRoute(object)) = &sourced.object else {
            continue;
        };
        let route = &object.rule;
        for parent in &route.parents {
            let entry = by_kind
                .entry((parent.host.reference_key(), route.kind))
                .or_insert_with(|| Merged {
                    host: parent.host.clone(),
                    created: route.created,
                    exclusive: Exclusive::No,
                    routes: Vec::new(),
                    consumers: BTreeMap::new(),
                    objects: Vec::new(),
                });
            entry.exclusive.union(&match parent.port {
                Some(port) => Exclusive::Ports(vec![port]),
                None => Exclusive::AllPorts,
            });
            if age(route.created) < age(entry.created) {
                entry.created = route.created;
            }
            if !entry.objects.iter().any(|o| std::ptr::eq(*o, *sourced)) {
                entry.objects.push(sourced);
            }
            // GAMMA: a route in another namespace than its Service's is its clients' there.
            let consumer = route.id.namespace != parent.host.namespace;
            let producer = if consumer {
                let ports = entry
                    .consumers
                    .entry(route.id.namespace.clone())
                    .or_default();
                if !ports.contains(&parent.port) {
                    ports.push(parent.port);
                }
                (false, route.id.namespace.as_str())
            } else {
                PRODUCER
            };
            for (index, ranked) in route.routes.iter().enumerate() {
                let mut http = ranked.route.clone();
                for m in &mut http.matches {
                    m.port = parent.port;
                    if consumer {
                        m.source_namespace = Some(route.id.namespace.clone());
                    }
                }
                let order = (
                    producer,
                    Reverse(ranked.precedence),
                    age(route.created),
                    route.id.namespace.as_str(),
                    route.id.name.as_str(),
                    index,
                );
                entry.routes.push((order, http));
            }
        }
    }

    // The Gateway API never merges an HTTPRoute and a GRPCRoute: the older set takes the
    // Service, as between a VirtualService and routes.
    let mut warnings = Vec::new();
    let mut merged: BTreeMap<String, Merged> = BTreeMap::new();
    for ((key, kind), entry) in by_kind {
        let Some(other) = merged.remove(&key) else {
            merged.insert(key, entry);
            continue;
        };
        // `other` is the HTTPRoutes' (keys sort by kind): it keeps the Service on a tie.
        let (kept, lost, lost_kind, kept_kind) = if age(entry.created) < age(other.created) {
            (entry, other, "HTTPRoute", "GRPCRoute")
        } else {
            (other, entry, "GRPCRoute", "HTTPRoute")
        };
        debug_assert_eq!(kind, RouteKind::Grpc);
        for route in &lost.objects {
            warnings.push(warning(
                route,
                "spec.parentRefs",
                format!(
                    "Service {} is also routed by {}, which is not newer: a {kept_kind} and a \
                     {lost_kind} are never merged, so its rules are used and this route's are not",
                    kept.host.name,
                    object_names(&kept.objects),
                ),
            ));
        }
        merged.insert(key, kept);
    }
    let mut lost: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (i, sourced) in virtual_services.iter().enumerate() {
        let Object::VirtualService(object) = &sourced.object else {
            continue;
        };
        let vs = &object.rule;
        if !vs.gateways.iter().any(|g| g == "mesh") {
            continue;
        }
        for host in &vs.hosts {
            let key = host.reference_key();
            let Some(routes) = merged.get(&key) else {
                continue;
            };
            if age(routes.created) < age(vs.created) {
                lost.entry(i).or_default().push(key);
                let names = object_names(&routes.objects);
                warnings.push(warning(
                    sourced,
                    "spec.hosts",
                    format!(
                        "host {} is also routed by {names}, which is older: its rules are used \
                         for the host and this VirtualService's are not (the oldest object \
                         takes a host, as in Istio)",
                        host.name
                    ),
                ));
            } else {
                for route in &routes.objects {
                    warnings.push(warning(
                        route,
                        "spec.parentRefs",
                        format!(
                            "Service {} is also routed by VirtualService {}/{}, which is not \
                             newer: its rules are used and this route's are not (the oldest \
                             object takes a host, as in Istio)",
                            routes.host.name, vs.id.namespace, vs.id.name
                        ),
                    ));
                }
                merged.remove(&key);
            }
        }
    }

    let mut result = Vec::with_capacity(virtual_services.len() + merged.len());
    for (i, sourced) in virtual_services.iter().enumerate() {
        let Object::VirtualService(object) = &sourced.object else {
            continue;
        };
        match lost.get(&i) {
            None => result.push(Arc::clone(&object.rule)),
            Some(keys) => {
                let mut vs = VirtualService::clone(&object.rule);
                vs.hosts.retain(|h| !keys.contains(&h.reference_key()));
                if !vs.hosts.is_empty() {
                    result.push(Arc::new(vs));
                }
            }
        }
    }
    for merged in merged.into_values() {
        let mut routes = merged.routes;
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut http = Vec::with_capacity(routes.len() + merged.consumers.len());
        let mut consumers = merged.consumers.iter().peekable();
        for ((producer, ..), route) in routes {
            // A namespace's consumer routes take the Service whole for its clients: what none
            // of them matches is 404, never a producer route.
            while let Some((namespace, ports)) =
                consumers.next_if(|(namespace, _)| producer != (false, namespace.as_str()))
            {
                http.extend(unmatched(namespace, ports));
            }
            http.push(route);
        }
        for (namespace, ports) in consumers {
            http.extend(unmatched(namespace, ports));
        }
        result.push(Arc::new(VirtualService {
            id: ObjectRef {
                namespace: merged.host.namespace.clone(),
                name: merged.host.name.clone(),
            },
            hosts: vec![merged.host],
            gateways: vec!["mesh".to_owned()],
            http,
            created: merged.created,
            exclusive: merged.exclusive,
        }));
    }
    result.extend(at_gateways(routes));
    Claims {
        virtual_services: result,
        warnings,
    }
}

/// The routes attached to Gateways, as VirtualServices bound to them: one per gateway, host
/// and route namespace (the namespace a listener's `allowedRoutes` judges), most specific
/// match first, as at a Service.
fn at_gateways(routes: &[&Sourced]) -> Vec<Arc<VirtualService>> {
    /// The routes for one gateway, host and namespace, and the oldest one's creation time.
    #[derive(Default)]
    struct Bound<'a> {
        created: Option<Timestamp>,
        routes: Vec<(Order<'a>, HttpRoute)>,
    }
    let mut bound: BTreeMap<(String, String, String), Bound> = BTreeMap::new();
    for sourced in routes {
        let (Object::HttpRoute(object) | Object::GrpcRoute(object)) = &sourced.object else {
            continue;
        };
        let route = &object.rule;
        let any_host = ["*".to_owned()];
        let hosts = if route.hostnames.is_empty() {
            &any_host[..]
        } else {
            &route.hostnames[..]
        };
        for parent in &route.gateways {
            let gateway = format!("{}/{}", parent.gateway.namespace, parent.gateway.name);
            for host in hosts {
                let key = (gateway.clone(), host.clone(), route.id.namespace.clone());
                let entry = bound.entry(key).or_insert_with(|| Bound {
                    created: route.created,
                    routes: Vec::new(),
                });
                if age(route.created) < age(entry.created) {
                    entry.created = route.created;
                }
                for (index, ranked) in route.routes.iter().enumerate() {
                    let mut http = ranked.route.clone();
                    for m in &mut http.matches {
                        m.port = parent.port;
                    }
                    let order = (
                        PRODUCER,
                        Reverse(ranked.precedence),
                        age(route.created),
                        route.id.namespace.as_str(),
                        route.id.name.as_str(),
                        index,
                    );
                    entry.routes.push((order, http));
                }
            }
        }
    }
    bound
        .into_iter()
        .map(|((gateway, host, namespace), mut bound)| {
            bound.routes.sort_by(|a, b| a.0.cmp(&b.0));
            let name = gateway.rsplit('/').next().unwrap_or_default().to_owned();
            Arc::new(VirtualService {
                id: ObjectRef {
                    namespace: namespace.clone(),
                    name,
                },
                hosts: vec![Host {
                    name: host,
                    namespace,
                }],
                gateways: vec![gateway],
                http: bound.routes.into_iter().map(|(_, route)| route).collect(),
                created: bound.created,
                exclusive: Exclusive::No,
            })
        })
        .collect()
}

/// For the clients of `namespace`, on each of `ports`: 404 to what its consumer routes leave.
fn unmatched<'a>(
    namespace: &'a str,
    ports: &'a [Option<u16>],
) -> impl Iterator<Item = HttpRoute> + 'a {
    ports.iter().map(move |&port| HttpRoute {
        name: Some(format!("{namespace}.consumer-routes.unmatched")),
        matches: vec![RequestMatch {
            port,
            source_namespace: Some(namespace.to_owned()),
            ..RequestMatch::default()
        }],
        route: Vec::new(),
        redirect: None,
        direct_response: Some(404),
        rewrite: None,
        headers: Headers::default(),
        timeout: None,
        retries: None,
        fault: None,
        mirror: None,
    })
}

fn object_names(objects: &[&Sourced]) -> String {
    let names: Vec<String> = objects
        .iter()
        .map(|o| {
            let kind = o.key.kind.split('.').next().unwrap_or_default();
            format!("{kind} {}/{}", o.key.namespace, o.key.name)
        })
        .collect();
    names.join(", ")
}

fn warning(sourced: &Sourced, field: &str, reason: String) -> Diagnostic {
    Diagnostic {
        severity: Severity::Warning,
        file: sourced.origin.to_string(),
        object: sourced.key.to_string(),
        field: field.to_owned(),
        reason,
    }
}
