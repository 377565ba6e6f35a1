//! The set of objects in force: a base — a folder of Kubernetes-shaped YAML/JSON (`Service`,
//! `EndpointSlice`, `Pod`, `VirtualService`, `DestinationRule`, `Gateway`) in local mode, or
//! what the API server's watches hold in Kubernetes mode — plus objects applied and deleted at
//! run time through the admin API (`mesh-agent apply/delete -f`).
//!
//! Objects are identified as Kubernetes does, by kind, namespace and name. Applied objects
//! replace the folder's object of the same identity; deleted ones are hidden from the folder
//! until applied again or the agent restarts. The folder itself is never written.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
};

use serde::Serialize;
use serde_json::Value;

use super::{discover, Discovered};
use crate::config::{self, model::MeshConfig, Diagnostic, Severity};

/// Kubernetes identity of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// One object as read, with the file (or `apply` label) it came from.
#[derive(Clone, Debug)]
struct Sourced {
    file: String,
    value: Value,
}

/// A consistent, validated set of everything the agent needs.
#[derive(Debug)]
pub struct Loaded {
    pub config: MeshConfig,
    pub discovered: Discovered,
    /// Warnings only: a load with errors is never returned as `Loaded`.
    pub warnings: Vec<Diagnostic>,
    /// Every object in force, for `get` and `config_dump`.
    pub objects: BTreeMap<ObjectKey, Value>,
}

#[derive(Debug, Default)]
pub struct LocalSource {
    dir: Option<PathBuf>,
    /// Kubernetes mode: the watched objects, replacing the folder.
    watched: Option<BTreeMap<ObjectKey, Sourced>>,
    applied: BTreeMap<ObjectKey, Sourced>,
    deleted: BTreeSet<ObjectKey>,
}

impl LocalSource {
    /// A source reading `dir` (none: only applied objects).
    pub fn new(dir: Option<PathBuf>) -> Self {
        LocalSource {
            dir,
            ..Default::default()
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Kubernetes mode: replaces the base with the objects the API server holds (each with
    /// `kind` and `apiVersion` set), labelled as `source` in diagnostics.
    pub fn set_watched(
        &mut self,
        source: &str,
        objects: Vec<Value>,
    ) -> Result<Loaded, Vec<Diagnostic>> {
        let mut watched = BTreeMap::new();
        let mut errors = Vec::new();
        for object in objects {
            match keyed(source, object) {
                Ok((key, object)) => {
                    watched.insert(key, object);
                }
                Err(diagnostics) => errors.extend(diagnostics),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let loaded = build(merge(watched.clone(), &self.applied, &self.deleted))?;
        self.watched = Some(watched);
        Ok(loaded)
    }

    /// Reads the folder and builds the full set; `Err` lists every error (and warning).
    pub fn load(&self) -> Result<Loaded, Vec<Diagnostic>> {
        let folder = self.read_folder()?;
        build(merge(folder, &self.applied, &self.deleted))
    }

    /// Applies the objects in `text` if the resulting set is valid; otherwise changes nothing.
    pub fn apply(
        &mut self,
        label: &str,
        text: &str,
    ) -> Result<(Loaded, Vec<ObjectKey>), Vec<Diagnostic>> {
        let objects = documents(label, text)?;
        let mut applied = self.applied.clone();
        let mut deleted = self.deleted.clone();
        let mut keys = Vec::new();
        for (key, object) in objects {
            deleted.remove(&key);
            applied.insert(key.clone(), object);
            keys.push(key);
        }
        let loaded = build(merge(self.read_folder()?, &applied, &deleted))?;
        self.applied = applied;
        self.deleted = deleted;
        Ok((loaded, keys))
    }

    /// Deletes the objects named in `text` (only kind, namespace and name matter); objects that
    /// do not exist are reported as errors and nothing changes.
    pub fn delete(
        &mut self,
        label: &str,
        text: &str,
    ) -> Result<(Loaded, Vec<ObjectKey>), Vec<Diagnostic>> {
        let objects = documents(label, text)?;
        let folder = self.read_folder()?;
        let mut applied = self.applied.clone();
        let mut deleted = self.deleted.clone();
        let mut keys = Vec::new();
        let mut missing = Vec::new();
        for (key, _) in objects {
            let in_folder = folder.contains_key(&key) && !deleted.contains(&key);
            if applied.remove(&key).is_none() && !in_folder {
                missing.push(error(label, &key, "not found"));
                continue;
            }
            if folder.contains_key(&key) {
                deleted.insert(key.clone());
            }
            keys.push(key);
        }
        if !missing.is_empty() {
            return Err(missing);
        }
        let loaded = build(merge(folder, &applied, &deleted))?;
        self.applied = applied;
        self.deleted = deleted;
        Ok((loaded, keys))
    }

    fn read_folder(&self) -> Result<BTreeMap<ObjectKey, Sourced>, Vec<Diagnostic>> {
        if let Some(watched) = &self.watched {
            return Ok(watched.clone());
        }
        let Some(dir) = &self.dir else {
            return Ok(BTreeMap::new());
        };
        let mut files = Vec::new();
        config::config_files(dir, &mut files).map_err(|e| {
            vec![Diagnostic {
                severity: Severity::Error,
                file: dir.display().to_string(),
                object: String::new(),
                field: String::new(),
                reason: format!("cannot read the config folder: {e}"),
            }]
        })?;
        let mut objects = BTreeMap::new();
        let mut errors = Vec::new();
        for file in files {
            let label = file.display().to_string();
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) => {
                    errors.push(file_error(&label, format!("cannot read: {e}")));
                    continue;
                }
            };
            match documents(&label, &text) {
                Ok(found) => {
                    for (key, object) in found {
                        if let Some(previous) = objects.insert(key.clone(), object) {
                            errors.push(error(
                                &label,
                                &key,
                                format!("defined again (first in {})", previous.file),
                            ));
                        }
                    }
                }
                Err(diagnostics) => errors.extend(diagnostics),
            }
        }
        if errors.is_empty() {
            Ok(objects)
        } else {
            Err(errors)
        }
    }
}

fn merge(
    mut folder: BTreeMap<ObjectKey, Sourced>,
    applied: &BTreeMap<ObjectKey, Sourced>,
    deleted: &BTreeSet<ObjectKey>,
) -> BTreeMap<ObjectKey, Sourced> {
    folder.retain(|key, _| !deleted.contains(key));
    folder.extend(applied.iter().map(|(k, v)| (k.clone(), v.clone())));
    folder
}

/// Validates a full set of objects and builds config and discovery from it.
fn build(objects: BTreeMap<ObjectKey, Sourced>) -> Result<Loaded, Vec<Diagnostic>> {
    let sources: Vec<(String, String)> = objects
        .values()
        .map(|o| (o.file.clone(), o.value.to_string()))
        .collect();
    let loaded = config::load_sources(&sources);
    let (discovered, discovery_errors) = discover(&loaded.other_objects);
    let mut diagnostics = loaded.diagnostics;
    diagnostics.extend(discovery_errors);
    if diagnostics.iter().any(Diagnostic::is_error) {
        return Err(diagnostics);
    }
    Ok(Loaded {
        config: loaded.config,
        discovered,
        warnings: diagnostics,
        objects: objects.into_iter().map(|(k, o)| (k, o.value)).collect(),
    })
}

/// Splits a YAML/JSON text into its objects (expanding `kind: List`). Syntax errors and
/// objects without kind or name are reported with the loader's own messages.
fn documents(label: &str, text: &str) -> Result<Vec<(ObjectKey, Sourced)>, Vec<Diagnostic>> {
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = match <serde_yaml::Value as serde::Deserialize>::deserialize(document) {
            Ok(value) => value,
            Err(_) => return Err(config::load_str(label, text).diagnostics),
        };
        let Ok(value) = serde_json::to_value(value) else {
            return Err(config::load_str(label, text).diagnostics);
        };
        if value.is_null() {
            continue;
        }
        if value["kind"] == "List" {
            for item in value["items"].as_array().into_iter().flatten() {
                objects.push(keyed(label, item.clone())?);
            }
        } else {
            objects.push(keyed(label, value)?);
        }
    }
    Ok(objects)
}

fn keyed(label: &str, value: Value) -> Result<(ObjectKey, Sourced), Vec<Diagnostic>> {
    let kind = value["kind"].as_str();
    let name = value["metadata"]["name"].as_str();
    let (Some(kind), Some(name)) = (kind, name) else {
        return Err(vec![file_error(
            label,
            "every object needs kind and metadata.name",
        )]);
    };
    let key = ObjectKey {
        kind: kind.to_owned(),
        namespace: value["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned(),
        name: name.to_owned(),
    };
    Ok((
        key,
        Sourced {
            file: label.to_owned(),
            value,
        },
    ))
}

fn error(file: &str, key: &ObjectKey, reason: impl fmt::Display) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        file: file.to_owned(),
        object: key.to_string(),
        field: String::new(),
        reason: reason.to_string(),
    }
}

fn file_error(file: &str, reason: impl fmt::Display) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        file: file.to_owned(),
        object: String::new(),
        field: String::new(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: service-c}
spec: {clusterIP: 10.96.0.30, ports: [{name: http, port: 8080}]}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: service-c}
spec:
  host: service-c
  subsets:
  - {name: version-v1, labels: {version: v1}}
  - {name: version-v2, labels: {version: v2}}
";

    fn vs(weight_v1: u32, weight_v2: u32) -> String {
        format!(
            "apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: service-c}}
spec:
  hosts: [service-c]
  http:
  - route:
    - {{destination: {{host: service-c, subset: version-v1}}, weight: {weight_v1}}}
    - {{destination: {{host: service-c, subset: version-v2}}, weight: {weight_v2}}}
"
        )
    }

    fn folder(files: &[(&str, &str)]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    /// A throwaway directory under the system temp dir, removed on drop.
    mod tempdir {
        use std::path::{Path, PathBuf};
        pub struct Dir(PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path =
                    std::env::temp_dir().join(format!("mesh-local-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn apply_replaces_and_delete_removes_by_identity() {
        let dir = folder(&[("service.yml", SERVICE)]);
        let mut source = LocalSource::new(Some(dir.path().to_path_buf()));
        let loaded = source.load().unwrap();
        assert_eq!(loaded.discovered.registry.services.len(), 1);
        assert!(loaded.config.virtual_services.is_empty());

        let (loaded, keys) = source.apply("1-vs.yml", &vs(100, 0)).unwrap();
        assert_eq!(keys[0].to_string(), "VirtualService default/service-c");
        assert_eq!(
            loaded.config.virtual_services[0].http[0].route[0].weight,
            100
        );
        let (loaded, _) = source.apply("2-vs.yml", &vs(90, 10)).unwrap();
        assert_eq!(loaded.config.virtual_services.len(), 1);
        assert_eq!(
            loaded.config.virtual_services[0].http[0].route[1].weight,
            10
        );

        let (loaded, _) = source.delete("2-vs.yml", &vs(90, 10)).unwrap();
        assert!(loaded.config.virtual_services.is_empty());
        assert!(source.delete("2-vs.yml", &vs(90, 10)).is_err());
        // A folder object can be deleted too, and re-applied.
        let (loaded, _) = source.delete("dr.yml", SERVICE).unwrap();
        assert!(loaded.config.destination_rules.is_empty());
        assert!(loaded.discovered.registry.services.is_empty());
    }

    #[test]
    fn an_invalid_apply_changes_nothing_and_names_file_object_field() {
        let dir = folder(&[("service.yml", SERVICE)]);
        let mut source = LocalSource::new(Some(dir.path().to_path_buf()));
        source.apply("good.yml", &vs(90, 10)).unwrap();
        let errors = source.apply("bad.yml", &vs(90, 20)).unwrap_err();
        let error = errors.iter().find(|d| d.is_error()).unwrap();
        assert_eq!(error.file, "bad.yml");
        assert_eq!(error.object, "VirtualService default/service-c");
        assert!(error.field.starts_with("spec.http[0].route"), "{error}");
        let loaded = source.load().unwrap();
        assert_eq!(
            loaded.config.virtual_services[0].http[0].route[1].weight,
            10
        );
    }

    #[test]
    fn a_bad_folder_file_is_reported_and_a_duplicate_is_an_error() {
        let dir = folder(&[("a.yml", SERVICE), ("b.yml", SERVICE)]);
        let errors = LocalSource::new(Some(dir.path().to_path_buf()))
            .load()
            .unwrap_err();
        assert!(
            errors.iter().any(|d| d.reason.contains("defined again")),
            "{errors:?}"
        );
        let dir = folder(&[("a.yml", "kind: [unclosed")]);
        let errors = LocalSource::new(Some(dir.path().to_path_buf()))
            .load()
            .unwrap_err();
        assert!(errors[0].file.ends_with("a.yml"), "{errors:?}");
    }
}
