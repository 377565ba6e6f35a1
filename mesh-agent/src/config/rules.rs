//! The rules that span objects: a named subset must be defined by a DestinationRule for its host
//! (wherever the two were written), and the Istio objects of a set become the [`MeshConfig`] the
//! engine compiles.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use super::{
    diagnostic::{Diagnostic, Severity},
    model::{Host, MeshConfig},
    object::{Object, ObjectKey, ObjectSet, Sourced},
};

/// The Istio objects of `objects`, in key order.
pub fn mesh_config(objects: &ObjectSet) -> MeshConfig {
    let mut config = MeshConfig::default();
    for sourced in istio_objects(objects) {
        match &sourced.object {
            Object::VirtualService(o) => config.virtual_services.push(Arc::clone(&o.rule)),
            Object::DestinationRule(o) => config.destination_rules.push(Arc::clone(&o.rule)),
            Object::Gateway(o) => config.gateways.push(Arc::clone(&o.rule)),
            _ => {}
        }
    }
    config
}

/// Whether a change to an object of this kind can change the [`MeshConfig`].
pub fn is_istio_kind(kind: &str) -> bool {
    matches!(kind, "VirtualService" | "DestinationRule" | "Gateway")
}

/// The Istio objects of the set, without walking the others (keys sort by kind first).
fn istio_objects(objects: &ObjectSet) -> impl Iterator<Item = &Arc<Sourced>> {
    ["DestinationRule", "Gateway", "VirtualService"]
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

/// Every subset a route or mirror names must be defined by a DestinationRule for its host,
/// looked for across the whole set (VirtualServices and DestinationRules may live in different
/// files). Istio merges the subsets of several rules for one host; so do we here. References to
/// hosts in `unknown_rule_hosts` (rules that failed to load: their subsets are unknown, not
/// missing) are not reported. Returns one error per bad reference, naming its VirtualService.
pub fn check_subsets(objects: &[&Sourced], unknown_rule_hosts: &[Host]) -> Vec<SubsetError> {
    let mut subsets_by_host: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for sourced in objects {
        if let Object::DestinationRule(rule) = &sourced.object {
            subsets_by_host
                .entry(reference_key(&rule.rule.host))
                .or_default()
                .extend(rule.rule.subsets.iter().map(|s| s.name.as_str()));
        }
    }
    let unknown: BTreeSet<String> = unknown_rule_hosts.iter().map(reference_key).collect();
    let mut errors = Vec::new();
    for sourced in objects {
        let Object::VirtualService(vs) = &sourced.object else {
            continue;
        };
        for reference in vs.subsets.iter() {
            let key = reference_key(&reference.host);
            if unknown.contains(&key) {
                continue;
            }
            let defined = subsets_by_host.get(&key).or_else(|| {
                subsets_by_host
                    .iter()
                    .find(|(host, _)| wildcard_covers(host, &key))
                    .map(|(_, subsets)| subsets)
            });
            let reason = match defined {
                Some(subsets) if subsets.contains(&reference.subset.as_str()) => continue,
                Some(subsets) if subsets.is_empty() => format!(
                    "unknown subset {:?}: the DestinationRule for host {} defines no subsets",
                    reference.subset, reference.host.name
                ),
                Some(subsets) => format!(
                    "unknown subset {:?}: the DestinationRule for host {} defines {}",
                    reference.subset,
                    reference.host.name,
                    subsets.join(", ")
                ),
                None => format!(
                    "unknown subset {:?}: no DestinationRule for host {}",
                    reference.subset, reference.host.name
                ),
            };
            errors.push(SubsetError {
                key: sourced.key.clone(),
                diagnostic: Diagnostic {
                    severity: Severity::Error,
                    file: sourced.origin.to_string(),
                    object: sourced.key.to_string(),
                    field: reference.field.clone(),
                    reason,
                },
            });
        }
    }
    errors
}

/// A reference to a subset nobody defines.
#[derive(Debug)]
pub struct SubsetError {
    /// The VirtualService that names it.
    pub key: ObjectKey,
    pub diagnostic: Diagnostic,
}

/// Expands Kubernetes short names (`svc`, `svc.ns`, `svc.ns.svc`) so that a reference and a
/// rule written differently for the same service compare equal. Only for this check: real
/// host resolution belongs to the service registry.
fn reference_key(host: &Host) -> String {
    let name = host.name.trim_end_matches('.').to_ascii_lowercase();
    match name.matches('.').count() {
        _ if name.starts_with('*') => name,
        0 => format!("{name}.{}.svc.cluster.local", host.namespace),
        1 => format!("{name}.svc.cluster.local"),
        2 if name.ends_with(".svc") => format!("{name}.cluster.local"),
        _ => name,
    }
}

fn wildcard_covers(pattern: &str, host: &str) -> bool {
    pattern == "*"
        || pattern
            .strip_prefix('*')
            .is_some_and(|suffix| host.ends_with(suffix))
}
