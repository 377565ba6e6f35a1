//! Raw Kubernetes/Istio objects in, validated `model` out.
//!
//! Reads `networking.istio.io` `VirtualService`, `DestinationRule` and `Gateway` (`v1alpha3`,
//! `v1beta1`, `v1`) from YAML or JSON, one or many documents per file, or a `kind: List`.
//! Objects of every other kind are handed back untouched in [`Loaded::other_objects`], so one
//! loader reads a whole folder. Every problem becomes a [`Diagnostic`]: unknown or unsupported
//! fields are warnings, invalid values are errors, and all of them are reported, not the first.
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

mod destination_rule;
mod diagnostic;
mod fields;
mod gateway;
mod loader;
pub mod model;
mod raw;
pub mod values;
mod virtual_service;

use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use diagnostic::{Diagnostic, Severity};
use model::MeshConfig;

/// A Kubernetes object of a kind this module does not interpret (Service, EndpointSlice, Pod,
/// ServiceEntry, ...), as read, with the file it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct RawObject {
    pub file: String,
    pub value: serde_json::Value,
}

impl RawObject {
    pub fn kind(&self) -> Option<&str> {
        self.value.get("kind")?.as_str()
    }

    pub fn api_version(&self) -> Option<&str> {
        self.value.get("apiVersion")?.as_str()
    }
}

/// The result of one load. `config` holds only the objects that had no error; when
/// [`Loaded::is_ok`] is false the load as a whole must not be put in force, because the
/// objects left out (or their subsets) would silently change routing.
#[derive(Debug, Default)]
pub struct Loaded {
    pub config: MeshConfig,
    pub other_objects: Vec<RawObject>,
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
}

/// Loads one text; `file_label` names it in diagnostics (a `.json` suffix selects JSON).
pub fn load_str(file_label: &str, text: &str) -> Loaded {
    load_sources(&[(file_label, text)])
}

/// Loads several texts as one set: cross-object rules (subsets named by a VirtualService in
/// one source and defined by a DestinationRule in another, redefinitions) span all of them.
pub fn load_sources<L: AsRef<str>, T: AsRef<str>>(sources: &[(L, T)]) -> Loaded {
    let mut collector = loader::Collector::default();
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
    let mut collector = loader::Collector::default();
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
        "{} file(s): {} VirtualService, {} DestinationRule, {} Gateway, {} other object(s); \
         {} error(s), {} warning(s)",
        loaded.files.len(),
        config.virtual_services.len(),
        config.destination_rules.len(),
        config.gateways.len(),
        loaded.other_objects.len(),
        loaded.errors().count(),
        loaded.warnings().count(),
    )?;
    Ok(loaded.is_ok())
}

#[cfg(test)]
mod tests;
