//! Istio's `AuthorizationPolicy`, evaluated by the destination's agent: on each connection a
//! tunnel delivers to a pod (the source's authenticated identity, addresses and port), and on
//! each HTTP request of it when a rule looks at HTTP (hosts, methods, paths, request headers).
//!
//! Which policies apply to a workload is Istio's rule: a policy in the root namespace
//! (`istio-system`) applies to the whole mesh, any other to its own namespace; a `selector`
//! narrows either to the workloads whose labels it matches. Evaluation order is Istio's: a
//! matching `CUSTOM` or `DENY` policy denies; then, if any `ALLOW` policy applies, the request
//! must match one of them; `AUDIT` policies only mark what they match for the log.
//!
//! Rules are judged in three-valued logic: a part that cannot be judged here (an HTTP field on
//! a connection that is not HTTP, a field this mesh does not implement) is *unknown*, which no
//! `ALLOW` rule accepts and every `DENY` rule does — the policy fails closed, as ztunnel's do.
//!
//! Istio's `PeerAuthentication` is resolved here too ([`peer_authentication`]): which
//! connections a workload accepts, mutual TLS only or plaintext as well, port by port.

pub mod path;
pub mod peer_authentication;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::HeaderMap;

use crate::config::model::{
    AuthorizationAction, AuthorizationPolicy, AuthorizationRule, Condition, ObjectRef,
    OperationMatch, Pattern, SourceMatch, Values,
};

pub use crate::config::model::ROOT_NAMESPACE;
pub use peer_authentication::{MtlsMode, PeerAuthentications, PodMtls};

/// The policies in force.
#[derive(Debug, Default)]
pub struct Authorization {
    policies: Vec<Arc<AuthorizationPolicy>>,
}

impl Authorization {
    pub fn new(policies: &[Arc<AuthorizationPolicy>]) -> Authorization {
        Authorization {
            policies: policies.to_vec(),
        }
    }

    /// Whether these are exactly `policies` (the same objects), so nothing changed.
    pub fn holds(&self, policies: &[Arc<AuthorizationPolicy>]) -> bool {
        self.policies.len() == policies.len()
            && self
                .policies
                .iter()
                .zip(policies)
                .all(|(held, other)| Arc::ptr_eq(held, other))
    }

    /// The policies that apply to a workload of `namespace` with `labels`.
    pub fn for_workload(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Policies {
        let applies = |policy: &AuthorizationPolicy| {
            let scope = policy.id.namespace == ROOT_NAMESPACE || policy.id.namespace == namespace;
            let selected = policy.selector.as_ref().is_none_or(|selector| {
                selector
                    .iter()
                    .all(|(key, value)| labels.get(key) == Some(value))
            });
            scope && selected
        };
        Policies {
            policies: self
                .policies
                .iter()
                .filter(|p| applies(p))
                .cloned()
                .collect(),
        }
    }
}

/// The policies of one workload; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    policies: Arc<[Arc<AuthorizationPolicy>]>,
}

/// What a connection or request is judged on.
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a> {
    /// The peer's SPIFFE ID without `spiffe://` (`None`: plaintext).
    pub principal: Option<&'a str>,
    pub source: IpAddr,
    pub destination: SocketAddr,
    /// `None`: a connection, judged before (or without) any HTTP.
    pub http: Option<HttpAttributes<'a>>,
}

#[derive(Clone, Copy, Debug)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// Normalized ([`path::normalize`]).
    pub path: &'a str,
    /// The request's authority (`Host`), as sent.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// The outcome: allowed or not, which policy decided, and the `AUDIT` policy that matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The `DENY` or `CUSTOM` policy that denied; `None` when allowed, or denied because no
    /// `ALLOW` policy matched.
    pub denied_by: Option<ObjectRef>,
    pub audited_by: Option<ObjectRef>,
}

impl Policies {
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Whether a rule looks at HTTP: then an HTTP connection is judged per request.
    pub fn reads_http(&self) -> bool {
        let operation = |o: &OperationMatch| {
            o.hosts.is_set() || o.methods.is_set() || o.paths.is_set() || o.unevaluable
        };
        let condition = |c: &Condition| matches!(c, Condition::RequestHeader(..));
        self.policies
            .iter()
            .flat_map(|p| &p.rules)
            .any(|rule| rule.to.iter().any(operation) || rule.when.iter().any(condition))
    }

    pub fn evaluate(&self, request: &Attributes) -> Decision {
        let mut decision = Decision {
            allowed: true,
            denied_by: None,
            audited_by: None,
        };
        let mut allow_policies = false;
        let mut allowed = false;
        for policy in self.policies.iter() {
            let matched = policy_matches(policy, request);
            match policy.action {
                AuthorizationAction::Custom | AuthorizationAction::Deny => {
                    if matched != Tri::No && decision.denied_by.is_none() {
                        decision.denied_by = Some(policy.id.clone());
                    }
                }
                AuthorizationAction::Audit => {
                    if matched != Tri::No && decision.audited_by.is_none() {
                        decision.audited_by = Some(policy.id.clone());
                    }
                }
                AuthorizationAction::Allow => {
                    allow_policies = true;
                    allowed |= matched == Tri::Yes;
                }
            }
        }
        decision.allowed = decision.denied_by.is_none() && (allowed || !allow_policies);
        decision
    }
}

/// Kleene's three values, ordered so that `and` is `min` and `or` is `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Tri {
    No,
    Unknown,
    Yes,
}

impl From<bool> for Tri {
    fn from(value: bool) -> Tri {
        if value {
            Tri::Yes
        } else {
            Tri::No
        }
    }
}

/// All of `parts` (`Yes` when there are none).
fn all(parts: impl IntoIterator<Item = Tri>) -> Tri {
    parts.into_iter().min().unwrap_or(Tri::Yes)
}

/// Any of `parts`, where no parts means no constraint.
fn any_or_unset(parts: impl IntoIterator<Item = Tri>) -> Tri {
    parts.into_iter().max().unwrap_or(Tri::Yes)
}

fn policy_matches(policy: &AuthorizationPolicy, request: &Attributes) -> Tri {
    // No rules: matches nothing.
    policy
        .rules
        .iter()
        .map(|rule| rule_matches(rule, request))
        .max()
        .unwrap_or(Tri::No)
}

fn rule_matches(rule: &AuthorizationRule, request: &Attributes) -> Tri {
    all([
        any_or_unset(rule.from.iter().map(|s| source_matches(s, request))),
        any_or_unset(rule.to.iter().map(|o| operation_matches(o, request))),
        all(rule.when.iter().map(|c| condition_matches(c, request))),
    ])
}

/// The namespace of a principal written as Istio writes it: `<trust domain>/ns/<ns>/sa/<sa>`.
fn namespace_of(principal: &str) -> Option<&str> {
    let (_, rest) = principal.split_once("/ns/")?;
    rest.split_once("/sa/").map(|(namespace, _)| namespace)
}

fn source_matches(source: &SourceMatch, request: &Attributes) -> Tri {
    let principal = request.principal;
    let namespace = principal.and_then(namespace_of);
    all([
        strings(&source.principals, principal),
        strings(&source.namespaces, namespace),
        blocks(&source.ip_blocks, request.source),
        blocks(&source.remote_ip_blocks, request.source),
        if source.unevaluable {
            Tri::Unknown
        } else {
            Tri::Yes
        },
    ])
}

fn operation_matches(operation: &OperationMatch, request: &Attributes) -> Tri {
    let http = request.http;
    let hosts = match http {
        // Lower-cased only for a rule that names hosts: most do not.
        Some(_) if !operation.hosts.is_set() => Tri::Yes,
        Some(http) => {
            let host = http.host.to_ascii_lowercase();
            let without_port = host
                .rsplit_once(':')
                .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
                .map_or(host.as_str(), |(name, _)| name);
            // A pattern may name the host with or without its port; either form hitting
            // counts, for `notHosts` as for `hosts`.
            values(&operation.hosts, |p| {
                p.matches(&host) || p.matches(without_port)
            })
        }
        None => unknown_if_set(&operation.hosts),
    };
    let port = request.destination.port();
    all([
        hosts,
        http.map_or_else(
            || unknown_if_set(&operation.methods),
            |http| strings(&operation.methods, Some(http.method)),
        ),
        http.map_or_else(
            || unknown_if_set(&operation.paths),
            |http| strings(&operation.paths, Some(http.path)),
        ),
        values(&operation.ports, |p| *p == port),
        if operation.unevaluable {
            Tri::Unknown
        } else {
            Tri::Yes
        },
    ])
}

fn condition_matches(condition: &Condition, request: &Attributes) -> Tri {
    match condition {
        Condition::RequestHeader(name, patterns) => match request.http {
            // Several values of one header are judged joined, as Envoy joins them.
            Some(http) => {
                let all = http.headers.get_all(name);
                let mut each = all.iter();
                match (each.next(), each.next()) {
                    (None, _) => strings(patterns, None),
                    (Some(one), None) => strings(patterns, Some(one.to_str().unwrap_or_default())),
                    _ => {
                        let joined = all
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .collect::<Vec<_>>()
                            .join(",");
                        strings(patterns, Some(&joined))
                    }
                }
            }
            None => Tri::Unknown,
        },
        Condition::SourceIp(nets) | Condition::RemoteIp(nets) => blocks(nets, request.source),
        Condition::DestinationIp(nets) => blocks(nets, request.destination.ip()),
        Condition::SourceNamespace(patterns) => {
            strings(patterns, request.principal.and_then(namespace_of))
        }
        Condition::SourcePrincipal(patterns) => strings(patterns, request.principal),
        Condition::DestinationPort(ports) => values(ports, |p| *p == request.destination.port()),
        Condition::Unevaluable => Tri::Unknown,
    }
}

fn unknown_if_set<T>(values: &Values<T>) -> Tri {
    if values.is_set() {
        Tri::Unknown
    } else {
        Tri::Yes
    }
}

/// `values` against one value that may be absent (a plaintext peer has no principal): an absent
/// value matches no `values` and so every `notValues`.
fn strings(patterns: &Values<Pattern>, value: Option<&str>) -> Tri {
    let hit = |p: &Pattern| value.is_some_and(|v| p.matches(v));
    values(patterns, hit)
}

fn blocks(nets: &Values<ipnet::IpNet>, address: IpAddr) -> Tri {
    let address = match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    };
    values(nets, |net| net.contains(&address))
}

fn values<T>(values: &Values<T>, hit: impl Fn(&T) -> bool) -> Tri {
    let any = values.any_of.is_empty() || values.any_of.iter().any(&hit);
    let none = !values.none_of.iter().any(&hit);
    Tri::from(any && none)
}

#[cfg(test)]
mod tests;
