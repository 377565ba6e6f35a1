//! Documents in, objects sorted by kind out; then the rules that span objects (a later
//! definition of the same object replaces an earlier one; named subsets must exist).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::diagnostic::{Diagnostic, ObjectContext, Severity};
use super::model::{DestinationRule, Gateway, Host, MeshConfig, ObjectRef, VirtualService};
use super::virtual_service::SubsetRef;
use super::{destination_rule, gateway, raw, virtual_service, Loaded, RawObject};

const GROUP: &str = "networking.istio.io";
const VERSIONS: &[&str] = &["v1alpha3", "v1beta1", "v1"];
const TOP_LEVEL_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];

/// One accepted object and where it came from.
struct Entry<T> {
    file: String,
    object: String,
    value: T,
}

#[derive(Default)]
pub(super) struct Collector {
    virtual_services: Vec<Entry<(VirtualService, Vec<SubsetRef>)>>,
    destination_rules: Vec<Entry<DestinationRule>>,
    gateways: Vec<Entry<Gateway>>,
    /// Hosts of DestinationRules rejected for errors: their subsets are unknown, not missing,
    /// so references to them are not reported a second time.
    rejected_rule_hosts: Vec<Host>,
    other_objects: Vec<RawObject>,
    diagnostics: Vec<Diagnostic>,
}

impl Collector {
    /// A finding about a whole file (unreadable, not YAML, ...).
    pub fn file_diagnostic(
        &mut self,
        file: &str,
        severity: Severity,
        reason: impl std::fmt::Display,
    ) {
        self.push(file, "", "", severity, reason);
    }

    /// Reads every document of one source. `.json` labels are read as a stream of JSON
    /// values; anything else as YAML (which also reads most JSON).
    pub fn add_source(&mut self, file: &str, text: &str) {
        if file.ends_with(".json") {
            for (i, document) in serde_json::Deserializer::from_str(text)
                .into_iter::<Value>()
                .enumerate()
            {
                match document {
                    Ok(value) => self.add_document(file, &format!("document {}", i + 1), value),
                    Err(e) => {
                        self.file_diagnostic(file, Severity::Error, format!("invalid JSON: {e}"));
                        break;
                    }
                }
            }
        } else {
            for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
                match Value::deserialize(document) {
                    Ok(value) => self.add_document(file, &format!("document {}", i + 1), value),
                    Err(e) => {
                        // The YAML parser cannot resynchronise after a syntax error.
                        self.file_diagnostic(file, Severity::Error, format!("invalid YAML: {e}"));
                        break;
                    }
                }
            }
        }
    }

    fn add_document(&mut self, file: &str, location: &str, value: Value) {
        let mut map = match value {
            Value::Null => return, // an empty document, e.g. after a trailing `---`
            Value::Object(map) => map,
            _ => {
                self.push(
                    file,
                    location,
                    "",
                    Severity::Error,
                    "expected a Kubernetes object (a mapping)",
                );
                return;
            }
        };
        let kind = map
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let api_version = map
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if kind == "List" {
            if let Some(Value::Array(items)) = map.remove("items") {
                for (i, item) in items.into_iter().enumerate() {
                    self.add_document(file, &format!("{location} items[{i}]"), item);
                }
                return;
            }
        }
        let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
        let ours = group == GROUP
            && matches!(
                kind.as_str(),
                "VirtualService" | "DestinationRule" | "Gateway"
            );
        if !ours {
            if kind.is_empty() || api_version.is_empty() {
                let field = if kind.is_empty() {
                    "kind"
                } else {
                    "apiVersion"
                };
                self.push(
                    file,
                    location,
                    field,
                    Severity::Error,
                    super::fields::MISSING,
                );
            } else {
                self.other_objects.push(RawObject {
                    file: file.to_owned(),
                    value: Value::Object(map),
                });
            }
            return;
        }

        let metadata = map.get("metadata").and_then(Value::as_object);
        let name = metadata
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let namespace = metadata
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .filter(|ns| !ns.is_empty())
            .unwrap_or("default");
        if name.is_empty() {
            self.push(
                file,
                &format!("{kind} ({location})"),
                "metadata.name",
                Severity::Error,
                super::fields::MISSING,
            );
            return;
        }
        let id = ObjectRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let object = format!("{kind} {}/{}", id.namespace, id.name);
        if !VERSIONS.contains(&version) {
            self.push(
                file,
                &object,
                "apiVersion",
                Severity::Error,
                format!(
                    "unsupported version {api_version:?}: expected {GROUP}/v1alpha3, v1beta1 or v1"
                ),
            );
            return;
        }
        self.add_istio_object(file, &object, &kind, id, map);
    }

    fn add_istio_object(
        &mut self,
        file: &str,
        object: &str,
        kind: &str,
        id: ObjectRef,
        mut map: Map<String, Value>,
    ) {
        let mut cx = ObjectContext::new(file, object, &mut self.diagnostics);
        for key in map
            .keys()
            .filter(|k| !TOP_LEVEL_FIELDS.contains(&k.as_str()))
        {
            cx.warn(key, "unknown field, ignored");
        }
        let Some(spec) = map.remove("spec") else {
            cx.error("spec", super::fields::MISSING);
            return;
        };
        match kind {
            "VirtualService" => {
                let Some(spec) = parse_spec::<raw::VirtualServiceSpec>(&mut cx, spec) else {
                    return;
                };
                let value = virtual_service::convert(&mut cx, &id, spec);
                if !cx.has_errors() {
                    self.virtual_services.push(entry(file, object, value));
                }
            }
            "DestinationRule" => {
                let Some(spec) = parse_spec::<raw::DestinationRuleSpec>(&mut cx, spec) else {
                    return;
                };
                let value = destination_rule::convert(&mut cx, &id, spec);
                if cx.has_errors() {
                    self.rejected_rule_hosts.push(value.host);
                } else {
                    self.destination_rules.push(entry(file, object, value));
                }
            }
            _ => {
                let Some(spec) = parse_spec::<raw::GatewaySpec>(&mut cx, spec) else {
                    return;
                };
                let value = gateway::convert(&mut cx, &id, spec);
                if !cx.has_errors() {
                    self.gateways.push(entry(file, object, value));
                }
            }
        }
    }

    fn push(
        &mut self,
        file: &str,
        object: &str,
        field: &str,
        severity: Severity,
        reason: impl std::fmt::Display,
    ) {
        self.diagnostics.push(Diagnostic {
            severity,
            file: file.to_owned(),
            object: object.to_owned(),
            field: field.to_owned(),
            reason: reason.to_string(),
        });
    }

    /// Applies the rules that span objects and files, then hands out the result.
    pub fn finish(mut self, files: Vec<String>) -> Loaded {
        let virtual_services = last_definition_wins(
            self.virtual_services,
            |(vs, _)| &vs.id,
            &mut self.diagnostics,
        );
        let destination_rules =
            last_definition_wins(self.destination_rules, |dr| &dr.id, &mut self.diagnostics);
        let gateways = last_definition_wins(self.gateways, |gw| &gw.id, &mut self.diagnostics);

        let in_error = check_subsets(
            &virtual_services,
            &destination_rules,
            &self.rejected_rule_hosts,
            &mut self.diagnostics,
        );

        Loaded {
            config: MeshConfig {
                virtual_services: virtual_services
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| !in_error.contains(i))
                    .map(|(_, e)| e.value.0)
                    .collect(),
                destination_rules: destination_rules.into_iter().map(|e| e.value).collect(),
                gateways: gateways.into_iter().map(|e| e.value).collect(),
            },
            other_objects: self.other_objects,
            diagnostics: self.diagnostics,
            files,
        }
    }
}

fn entry<T>(file: &str, object: &str, value: T) -> Entry<T> {
    Entry {
        file: file.to_owned(),
        object: object.to_owned(),
        value,
    }
}

/// Deserializes `spec`, warning about each unknown field and turning a type error into one
/// diagnostic with its path (serde cannot go on after it, so it is the object's last).
fn parse_spec<T: DeserializeOwned>(cx: &mut ObjectContext, spec: Value) -> Option<T> {
    let mut unknown = Vec::new();
    let result: Result<T, _> = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
        spec,
        &mut |path: serde_ignored::Path| unknown.push(join_path("spec", &ignored_path(&path))),
    ));
    for field in unknown {
        cx.warn(&field, "unknown field, ignored");
    }
    match result {
        Ok(spec) => Some(spec),
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            cx.error(&join_path("spec", &path), e.into_inner());
            None
        }
    }
}

/// `serde_ignored`'s path in the `a.b[0].c` form the rest of the diagnostics use.
fn ignored_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => join_path(&ignored_path(parent), key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

fn join_path(parent: &str, child: &str) -> String {
    match (
        parent.is_empty(),
        child.is_empty() || child.starts_with('['),
    ) {
        (true, _) => child.to_owned(),
        (false, true) => format!("{parent}{child}"),
        (false, false) => format!("{parent}.{child}"),
    }
}

/// As `kubectl apply -f` over the same files would leave it: a later definition of the same
/// kind/namespace/name replaces the earlier one. Warned, because inside one folder it is
/// usually a copy-paste slip.
fn last_definition_wins<T>(
    entries: Vec<Entry<T>>,
    id: impl Fn(&T) -> &ObjectRef,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<Entry<T>> {
    let mut position: HashMap<ObjectRef, usize> = HashMap::new();
    let mut kept: Vec<Option<Entry<T>>> = Vec::with_capacity(entries.len());
    for entry in entries {
        let key = id(&entry.value).clone();
        if let Some(earlier) = position.get(&key).and_then(|&i| kept[i].take()) {
            diagnostics.push(Diagnostic {
                severity: Severity::Warning,
                file: entry.file.clone(),
                object: entry.object.clone(),
                field: String::new(),
                reason: format!(
                    "replaces the definition in {}; only the last one is used",
                    earlier.file
                ),
            });
        }
        position.insert(key, kept.len());
        kept.push(Some(entry));
    }
    kept.into_iter().flatten().collect()
}

/// Every subset a route or mirror names must be defined by a DestinationRule for its host,
/// looked for across the whole load (VirtualServices and DestinationRules may live in
/// different files). Istio merges the subsets of several rules for one host; so do we here.
/// Returns the indices of the VirtualServices in error.
fn check_subsets(
    virtual_services: &[Entry<(VirtualService, Vec<SubsetRef>)>],
    destination_rules: &[Entry<DestinationRule>],
    rejected_rule_hosts: &[Host],
    diagnostics: &mut Vec<Diagnostic>,
) -> BTreeSet<usize> {
    let mut in_error = BTreeSet::new();
    let mut subsets_by_host: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for rule in destination_rules {
        let subsets = subsets_by_host
            .entry(reference_key(&rule.value.host))
            .or_default();
        subsets.extend(rule.value.subsets.iter().map(|s| s.name.as_str()));
    }
    let rejected: Vec<String> = rejected_rule_hosts.iter().map(reference_key).collect();
    for (index, vs) in virtual_services.iter().enumerate() {
        for reference in &vs.value.1 {
            let key = reference_key(&reference.host);
            if rejected.contains(&key) {
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
            diagnostics.push(Diagnostic {
                severity: Severity::Error,
                file: vs.file.clone(),
                object: vs.object.clone(),
                field: reference.field.clone(),
                reason,
            });
            in_error.insert(index);
        }
    }
    in_error
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
