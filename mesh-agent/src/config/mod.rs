//! The agent's input, read once and typed: text (YAML or JSON, one or many documents per file,
//! or a `kind: List`) becomes [`Document`]s, and each document one typed [`Sourced`] object —
//! `networking.istio.io` `VirtualService`, `DestinationRule` and `Gateway` (`v1alpha3`,
//! `v1beta1`, `v1`) and `security.istio.io` `AuthorizationPolicy` and `PeerAuthentication`
//! (`v1beta1`, `v1`) validated into [`model`], Kubernetes `Service`, `EndpointSlice` and `Pod` as
//! k8s-openapi types, the kinds of Istio's API groups the mesh does not implement kept as read
//! with a warning (`RequestAuthentication`, `ServiceEntry`, ...: not enforced), any other kind
//! kept as read. Objects live in an [`ObjectSet`] keyed by kind, namespace and name;
//! [`rules`](check_references) span objects, and [`mesh_config`] hands the Istio rules of a set
//! to the engine.
//!
//! Every problem becomes a [`Diagnostic`] naming file, object, field and reason: unknown or
//! unsupported fields are warnings, invalid values are errors, and all of them are reported. An
//! object with an error is rejected by itself ([`read_each`], [`Rejection`]; the store keeps its
//! last good version, if any); a reference to an object that does not exist (yet) is a warning.
//!
//! ```
//! use mesh_agent::config;
//! let loaded = config::load_str("vs.yml", "
//! apiVersion: networking.istio.io/v1beta1
//! kind: VirtualService
//! metadata: {name: service-c}
//! spec:
//!   hosts: [service-c]
//!   http:
//!   - route:
//!     - destination: {host: service-c}
//! ");
//! assert!(loaded.is_ok());
//! assert_eq!(loaded.config.virtual_services[0].http[0].route[0].weight, 100);
//! ```

mod authorization_policy;
mod destination_rule;
mod diagnostic;
mod document;
mod fields;
mod gateway;
mod gateway_api;
pub mod model;
mod object;
mod peer_authentication;
mod raw;
mod rejection;
mod rules;
pub mod values;
mod virtual_service;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use diagnostic::{Diagnostic, Severity};
pub use document::{documents, Document};
pub use gateway_api::{GRPC_ROUTE, HTTP_ROUTE};
use model::{Host, MeshConfig};
pub use object::{
    not_implemented, read, read_text, IstioObject, Object, ObjectKey, ObjectSet, Sourced,
    DEFAULT_NAMESPACE, ISTIO_API_GROUPS,
};
pub use rejection::{read_each, Rejection, COUNTED_KINDS};
pub use rules::{check_references, is_rule_kind, mesh_config, of_kind};

/// The result of one load (`mesh-agent validate`). `config` holds only the Istio objects that
/// had no error; [`Loaded::is_ok`] says whether any object had one.
#[derive(Debug, Default)]
pub struct Loaded {
    pub config: MeshConfig,
    /// Every object read without error, of every kind (a later definition replaces an earlier
    /// one of the same identity).
    pub objects: ObjectSet,
    /// Errors and warnings, in the order found (files in load order, then cross-object checks).
    pub diagnostics: Vec<Diagnostic>,
    /// The files read, in order.
    pub files: Vec<String>,
}

impl Loaded {
    /// No errors (warnings allowed).
    pub fn is_ok(&self) -> bool {
        !self.diagnostics.iter().any(Diagnostic::is_error)
    }

    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| !d.is_error())
    }

    /// The objects other than the Istio rules the mesh implements.
    pub fn other_objects(&self) -> impl Iterator<Item = &Sourced> {
        self.objects.values().map(|o| &**o).filter(|o| {
            !matches!(
                o.object,
                Object::VirtualService(_)
                    | Object::HttpRoute(_)
                    | Object::GrpcRoute(_)
                    | Object::DestinationRule(_)
                    | Object::Gateway(_)
                    | Object::AuthorizationPolicy(_)
                    | Object::PeerAuthentication(_)
            )
        })
    }
}

/// Reads texts into one set, as `kubectl apply -f` over them would leave it.
#[derive(Default)]
struct Collector {
    objects: ObjectSet,
    diagnostics: Vec<Diagnostic>,
    /// Hosts of DestinationRules rejected for errors: their subsets are unknown, not missing,
    /// so references to them are not reported a second time.
    unknown_rule_hosts: Vec<Host>,
}

impl Collector {
    fn add_source(&mut self, file: &str, text: &str) {
        match documents(file, text) {
            Ok(documents) => documents.into_iter().for_each(|d| self.add(file, d)),
            Err(error) => self.diagnostics.push(error),
        }
    }

    fn add(&mut self, file: &str, document: Document) {
        let rule_host = rule_host(&document);
        match read(file, document) {
            Ok(sourced) => {
                self.diagnostics.extend(sourced.warnings.iter().cloned());
                let key = sourced.key.clone();
                if let Some(earlier) = self.objects.insert(key.clone(), Arc::new(sourced)) {
                    // Inside one folder it is usually a copy-paste slip.
                    self.diagnostics.push(Diagnostic {
                        severity: Severity::Warning,
                        file: file.to_owned(),
                        object: key.to_string(),
                        field: String::new(),
                        reason: format!(
                            "replaces the definition in {}; only the last one is used",
                            earlier.origin
                        ),
                    });
                }
            }
            Err(diagnostics) => {
                self.diagnostics.extend(diagnostics);
                self.unknown_rule_hosts.extend(rule_host);
            }
        }
    }

    fn file_diagnostic(&mut self, file: &str, severity: Severity, reason: impl std::fmt::Display) {
        self.diagnostics
            .push(object::diagnostic(file, "", "", severity, reason));
    }

    /// Applies the rules that span objects and files, then hands out the result.
    fn finish(mut self, files: Vec<String>) -> Loaded {
        let objects: Vec<&Sourced> = self.objects.values().map(|o| &**o).collect();
        // Which hosts are services is not known here (a rule file is usually checked without
        // the cluster's Services): only subsets are looked up.
        let references = check_references(&objects, &self.unknown_rule_hosts, None);
        self.diagnostics.extend(references);
        Loaded {
            config: mesh_config(&self.objects),
            objects: self.objects,
            diagnostics: self.diagnostics,
            files,
        }
    }
}

/// The host of a DestinationRule as written, read before the rule is validated (so it is
/// known even when the rule is rejected).
fn rule_host(document: &Document) -> Option<Host> {
    let value = &document.value;
    let istio = value["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("networking.istio.io/"));
    if !istio || value["kind"] != "DestinationRule" {
        return None;
    }
    Some(Host {
        name: value["spec"]["host"].as_str()?.trim().to_owned(),
        namespace: value["metadata"]["namespace"]
            .as_str()
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_owned(),
    })
}

/// Loads one text; `file_label` names it in diagnostics (a `.json` suffix selects JSON).
pub fn load_str(file_label: &str, text: &str) -> Loaded {
    load_sources(&[(file_label, text)])
}

/// Loads several texts as one set: cross-object rules (subsets named by a VirtualService in
/// one source and defined by a DestinationRule in another, redefinitions) span all of them.
pub fn load_sources<L: AsRef<str>, T: AsRef<str>>(sources: &[(L, T)]) -> Loaded {
    let mut collector = Collector::default();
    for (label, text) in sources {
        collector.add_source(label.as_ref(), text.as_ref());
    }
    collector.finish(sources.iter().map(|(l, _)| l.as_ref().to_owned()).collect())
}

/// Loads a file, or every `*.yml`, `*.yaml` and `*.json` under a directory (recursively, in
/// sorted order), as one set.
pub fn load_path(path: &Path) -> Loaded {
    load_paths(&[path.to_path_buf()])
}

/// Loads files and directories as one set, in the order given.
pub fn load_paths(paths: &[PathBuf]) -> Loaded {
    let mut collector = Collector::default();
    let mut files = Vec::new();
    for path in paths {
        let label = path.display().to_string();
        if path.is_dir() {
            let mut found = Vec::new();
            if let Err(e) = config_files(path, &mut found) {
                collector.file_diagnostic(
                    &label,
                    Severity::Error,
                    format!("cannot read directory: {e}"),
                );
            }
            if found.is_empty() {
                collector.file_diagnostic(
                    &label,
                    Severity::Warning,
                    "no *.yml, *.yaml or *.json files found",
                );
            }
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    let mut labels = Vec::with_capacity(files.len());
    for file in files {
        let label = file.display().to_string();
        match std::fs::read_to_string(&file) {
            Ok(text) => collector.add_source(&label, &text),
            Err(e) => {
                collector.file_diagnostic(&label, Severity::Error, format!("cannot read: {e}"))
            }
        }
        labels.push(label);
    }
    collector.finish(labels)
}

/// Collects config files (`*.yml`, `*.yaml`, `*.json`) under `dir`, sorted for a deterministic
/// load order. Entries whose name starts with `.` are skipped: Kubernetes mounts a ConfigMap as
/// `..data/` plus symlinks to it, and reading both would define every object twice.
pub fn config_files(dir: &Path, found: &mut Vec<PathBuf>) -> io::Result<()> {
    let mut entries = std::fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<io::Result<Vec<_>>>()?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            config_files(&path, found)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yml" | "yaml" | "json"))
        {
            found.push(path);
        }
    }
    Ok(())
}

/// `mesh-agent validate`: loads `paths` as one set, prints every diagnostic as
/// `error: ...`/`warning: ...` (one per line) and a summary, and returns whether there was no
/// error. Starts nothing.
pub fn run_validate(paths: &[PathBuf], out: &mut impl Write) -> io::Result<bool> {
    let loaded = load_paths(paths);
    for diagnostic in &loaded.diagnostics {
        writeln!(out, "{}: {diagnostic}", diagnostic.severity)?;
    }
    let config = &loaded.config;
    writeln!(
        out,
        "{} file(s): {} VirtualService, {} HTTPRoute, {} GRPCRoute, {} DestinationRule, {} Gateway, \
         {} AuthorizationPolicy, {} PeerAuthentication, {} other object(s); {} error(s), \
         {} warning(s)",
        loaded.files.len(),
        of_kind(&loaded.objects, "VirtualService").count(),
        of_kind(&loaded.objects, HTTP_ROUTE).count(),
        of_kind(&loaded.objects, GRPC_ROUTE).count(),
        config.destination_rules.len(),
        config.gateways.len(),
        config.authorization_policies.len(),
        config.peer_authentications.len(),
        loaded.other_objects().count(),
        loaded.errors().count(),
        loaded.warnings().count(),
    )?;
    Ok(loaded.is_ok())
}

#[cfg(test)]
mod tests;
